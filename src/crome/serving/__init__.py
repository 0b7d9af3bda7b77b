"""``crome serve``: edit a model in the browser (``session``: the state and handlers; ``app``: the page)."""
