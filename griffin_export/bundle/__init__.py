"""The expert bundle: the file format (format.py, the only place that knows its tensor names and
metadata) and putting a bundle's experts into a base model (experts.py)."""
