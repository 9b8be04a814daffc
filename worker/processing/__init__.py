"""Processing: the inbox and its passes, the triage of claim answers, the pipeline that works on
claimed messages, busy waits and the isolation of suspects, failures and fault points.
"""
