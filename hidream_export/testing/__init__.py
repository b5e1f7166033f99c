"""What the tests and the demo run on: tiny random-weight checkpoints and model folders in the exact on-disk
format of the real HiDream-I1 ones (checkpoints.py, model_folder.py, tokenizers.py), and pytest marks
that skip with doctor's reasons (marks.py). Nothing here is downloaded."""
