"""The error of bad or missing data: a data prefix, an index, a tokenizer file, token ids."""


class DataError(ValueError):
    """Data the run cannot use; the message names the file or setting and what is expected."""
