"""The dashboard's static files (index.html, app.js, style.css), served by the edge at
/dashboard; shipped as package data, no build step."""
