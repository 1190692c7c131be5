"""Offline built-ins: a tiny chat model and a self-cognition dataset, so that everything
runs and is tested where no model hub can be reached."""
