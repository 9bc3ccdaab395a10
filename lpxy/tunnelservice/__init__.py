"""
The self-hosted tunnel service: C{twistd tunnelservice}.
"""
