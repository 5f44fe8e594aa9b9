"""fedalign_dist: federated fine-tuning of Mixture-of-Experts LMs on torch.distributed.

    import fedalign_dist as fd
    records = fd.run(fd.load_config("configs/demo.yaml"), "fed.rounds=2")
"""
__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "ConfigSection", "load_config", "run"]


def __getattr__(name: str):
    # Lazy: `fedalign-dist run` and `--help` start without importing torch.
    if name == "run":
        from fedalign_dist.api import run
        return run
    if name in ("Config", "ConfigError", "ConfigSection", "load_config"):
        from fedalign_dist import config
        return getattr(config, name)
    raise AttributeError(f"module 'fedalign_dist' has no attribute {name!r}")
