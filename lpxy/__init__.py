"""
lpxy: an AWS IoT Secure Tunneling local proxy and a self-hosted tunnel service.
"""

__version__ = "0.1.0"
