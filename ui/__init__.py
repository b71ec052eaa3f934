"""The Streamlit app's page helpers, one module per concern (the pages in ``app.py`` and
``pages/`` only lay out widgets; every rule is in :mod:`medcls`)."""
