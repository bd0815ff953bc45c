"""The aiohttp application: WebRTC signalling, health, the page, and its start-up/shutdown."""
