"""Process-group set-up, client placement and collectives (the only code that talks to torch.distributed)."""
