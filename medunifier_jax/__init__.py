"""MedUnifier in JAX/Flax NNX: ITC + ITM + ITG + TIG vision-language pre-training."""

__version__ = "0.1.0"
