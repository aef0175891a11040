"""Bridges to training frameworks users already run (Hugging Face Trainer); imported on demand."""
