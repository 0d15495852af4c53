"""Question-answer data shared by the slide LLM and VQA: the record format.

It lies below both: :mod:`slidevl.slidellm` trains on records and :mod:`slidevl.vqa`
builds, answers and scores them, and neither imports the other for it.
"""
