"""Launchers (SLURM via submitit, torchrun); model code never imports this package."""
