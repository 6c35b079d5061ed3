"""minillavamed: a readable re-implementation of LLaVA-Med (Li et al., 2023, arXiv 2306.00890).

`import minillavamed` stays cheap: the model class is imported on first use, so scripts that only need the
configs or the data tools do not pay for the model code.
"""

__all__ = ["LlavaMed"]


def __getattr__(name):
    if name == "LlavaMed":
        from minillavamed.llava import LlavaMed

        return LlavaMed
    raise AttributeError(f"module 'minillavamed' has no attribute {name!r}")
