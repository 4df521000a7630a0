"""Users' own training data: one JSON Lines format per stage, each read and checked by
its own module before any training starts (errors name FILE:LINE, the field and what was
expected). `rows.py` reads lines, `messages.py` checks chat messages, `render.py` turns
them into token ids and loss masks through the model's chat template."""
