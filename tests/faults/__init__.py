"""Fault injection: each case of issue 15 reproduced, and the fixed behaviour shown."""
