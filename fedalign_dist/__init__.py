"""fedalign_dist: federated fine-tuning of Mixture-of-Experts LMs on torch.distributed."""
__version__ = "0.1.0"
