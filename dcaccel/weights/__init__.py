"""Trained weights shipped with dcaccel (see dcaccel/shapes and build_scripts/train_shapes.py)."""
