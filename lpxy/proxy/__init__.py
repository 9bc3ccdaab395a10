"""
The local proxy: C{twistd localproxy} and the C{localproxy} console script.
"""
