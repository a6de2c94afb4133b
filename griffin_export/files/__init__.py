"""Files in and out: prompts from files, JSONL rows, and outputs that appear whole or not at all."""
