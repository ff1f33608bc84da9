"""Sweep reporting: read a Hydra multirun's runs (``runs``), summarise them per arm (``summary``), plot
them (``plots``, matplotlib), and the W&B logger factory that tags runs the same way (``wandb_logger``).
The command line is :mod:`ddtas_lightning.compare`."""
