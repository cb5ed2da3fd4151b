"""Fine-tuning a decoder LLM with LoRA and Adam-SPD, on tunix's models and
qwix's LoRA: a byte-level study that runs on a CPU, and real Hugging Face
checkpoints of the Qwen 3, Llama 3 and Gemma 3 families.

Run `python -m examples.llm.train --help`.
"""
