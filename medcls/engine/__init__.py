"""Answers: a predictor answers a scan, a series or a folder; the rules of what an answer may
claim (:mod:`~medcls.engine.findings`) and how it is said (:mod:`~medcls.engine.present`) are
written once here, and the screen, the reports and the integrations all read them."""
