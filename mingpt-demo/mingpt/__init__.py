"""A compact character-level GPT for the demo notebook (independent of ../src)."""
from .model import GPT, GPTConfig
from .trainer import Trainer, TrainerConfig
from .utils import sample, set_seed, top_k_logits

__all__ = ['GPT', 'GPTConfig', 'Trainer', 'TrainerConfig', 'sample', 'set_seed', 'top_k_logits']
