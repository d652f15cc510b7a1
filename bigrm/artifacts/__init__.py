"""What a run leaves behind: complete, verified checkpoints and verified Hugging Face exports."""
