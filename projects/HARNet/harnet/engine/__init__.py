"""Training and evaluation: trainers (yacs and LazyConfig), the two-step schedule, the
command line of ``train_net.py``, multi-process launch (NCCL or gloo) and visualisation."""
from .trainer import HARNetTrainer, fast_coco_eval_available
from .lazy_trainer import LazyConfigTrainer
from .two_step import train_two_step, two_step_configs
from .launch import launch_cpu, launch_from_args
from .defaults import argument_parser, main, setup

__all__ = [
    "HARNetTrainer",
    "LazyConfigTrainer",
    "argument_parser",
    "fast_coco_eval_available",
    "launch_cpu",
    "launch_from_args",
    "main",
    "setup",
    "train_two_step",
    "two_step_configs",
]
