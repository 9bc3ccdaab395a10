"""
twistd plugins for lpxy: C{twistd localproxy} and C{twistd tunnelservice}.

Nothing is imported from lpxy here: L{ServiceMaker} resolves the tap modules
only when the plugin is used, so C{twistd --help} stays cheap.
"""

from twisted.application.service import ServiceMaker

localproxy = ServiceMaker(
    "lpxy local proxy",
    "lpxy.proxy.tap",
    "AWS IoT Secure Tunneling local proxy (source or destination).",
    "localproxy",
)

tunnelservice = ServiceMaker(
    "lpxy tunnel service",
    "lpxy.tunnelservice.tap",
    "Self-hosted secure tunneling service: management API and data plane.",
    "tunnelservice",
)
