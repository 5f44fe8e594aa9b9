"""Config validation for privacy.enabled: refuse settings under which the stated guarantee
would be false (called from Config's validator)."""
from __future__ import annotations


def check_privacy_config(cfg) -> None:
    from fedalign_dist.strategies import strategy_class
    from fedalign_dist.strategies.base import Strategy
    p, cls = cfg.privacy, strategy_class(cfg.strategy.name)
    if p.delta >= 1.0 / cfg.fed.num_clients:
        raise ValueError(f"privacy.delta={p.delta:g} must be below 1 / fed.num_clients = {1 / cfg.fed.num_clients:g}: "
                         f"a larger delta allows publishing one client's data outright")
    if cls.shares_statistics and p.statistics_noise_multiplier is None and not p.accept_clear_statistics:
        raise ValueError(f"strategy {cfg.strategy.name} shares per-client statistics (routing usage, load, tokens, "
                         f"signatures or embeddings): with privacy.statistics_noise_multiplier=null they leave "
                         f"the client in the clear and epsilon would not cover them; set a multiplier, or "
                         f"accept it with privacy.accept_clear_statistics=true (the summary then says so)")
    if cls.shares_updates and cls.max_client_weight is Strategy.max_client_weight:
        raise ValueError(f"strategy {cfg.strategy.name} does not declare its clients' largest weight "
                         f"(Strategy.max_client_weight), so its noise cannot be calibrated under privacy.enabled")
    if cfg.guard.max_update_norm is not None and cfg.guard.on_large_update == "reject":
        raise ValueError("privacy.enabled with guard.on_large_update=reject: leaving a client out because of its "
                         "update's size changes the other clients' weights by its data; privacy.clip_norm already "
                         "bounds every update (use guard.on_large_update=clip, or drop guard.max_update_norm)")
    if p.target_epsilon is not None and cls.shares_updates:
        from fedalign_dist.privacy.accountant import epsilon
        from fedalign_dist.privacy.mechanism import accounted_mechanism
        first = epsilon(accounted_mechanism(cfg, cls), 1, p.delta)
        if first > p.target_epsilon:
            raise ValueError(f"privacy.target_epsilon={p.target_epsilon:g} is below the epsilon of a single round "
                             f"({first:.3g} at delta {p.delta:g}): no round could run; raise it, or the noise")
    cls.check_privacy(cfg)
