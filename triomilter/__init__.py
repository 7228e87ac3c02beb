"""triomilter: typed, pure-Python mail filters (milters) for Postfix and Sendmail, on Trio."""
