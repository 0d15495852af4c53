"""Web viewer for a job folder: deep-zoom slides, overlays, survival risk and a chat.

``slidevl serve JOB`` (see :mod:`slidevl.serve.cli`) runs :func:`slidevl.serve.app.create_app`
under uvicorn on 127.0.0.1. The chat is answered by any :class:`slidevl.serve.answerer.Answerer`;
without a VQA checkpoint that is :class:`slidevl.serve.jobfacts.JobFactsAnswerer`.
"""
