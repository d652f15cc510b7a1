"""bigrm: K-wise reward-model training on DeepSpeed."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # imported on first use: `import bigrm` stays free of torch and transformers
    if name == "RewardFunction":
        from bigrm.inference.reward_function import RewardFunction

        return RewardFunction
    raise AttributeError(f"module 'bigrm' has no attribute {name!r}")


__all__ = ["RewardFunction"]
