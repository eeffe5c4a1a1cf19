"""ticketforge: lottery-ticket compression of trained PyTorch models, exported and measured."""
__version__ = "0.1.0"
