"""
The local proxy: C{twistd localproxy} and the C{localproxy} console script.
"""

from lpxy import __version__

VERSION_LINE = f"localproxy (lpxy) {__version__}"
"""What C{localproxy -V} prints."""
