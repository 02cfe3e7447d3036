"""Preference alignment: the losses here (`losses.py`: reward model, DPO/IPO, ORPO), the recipes that train with them in
`lmforge.recipes`.
"""
