"""Why torch.load(weights_only=True) refused a file, in one line.

torch's UnpicklingError opens with a paragraph suggesting weights_only=False (which would run the file's
code); the line that names the culprit ("Trying to load unsupported GLOBAL posix.system ...") comes later.
The checkpoint scan (training/checkpointing/layout.py) and the GPT-2 loader (models/gpt.py) both quote that line.
"""


def refusal_reason(error: BaseException) -> str:
    """The line of a refused load's message that names what the file asked for."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                lines[0] if lines else type(error).__name__)
