"""controllink"""
