"""The web demo: the batching service (service.py, no Gradio) and its page (webapp.py)."""
