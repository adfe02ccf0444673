// A dev-server stand-in: an HTML page whose WebSocket round-trips through the preview proxy,
// and a `ws` WebSocket server that echoes, picks the last offered subprotocol, and closes
// with code 4001 when told "close". Usage: node ws_app.js PORT
const http = require('http');
const WS = require('ws');
const WebSocketServer = WS.WebSocketServer || WS.Server;
const port = Number(process.argv[2]);
const page = `<!doctype html><title>preview</title><p id="out">waiting</p><script>
const ws = new WebSocket('ws://' + location.host + '/socket', ['chat', 'hmr']);
ws.onopen = () => ws.send('ping');
ws.onmessage = (e) => {
  document.getElementById('out').textContent = e.data;
  fetch('/done?got=' + encodeURIComponent(e.data) + '&protocol=' + ws.protocol).then(() => ws.close());
};
</script>`;
const server = http.createServer((req, res) => {
  if (req.url.startsWith('/done')) {
    console.log(JSON.stringify({ done: req.url, cookie: req.headers.cookie || null }));
  }
  res.writeHead(200, { 'Content-Type': 'text/html' });
  res.end(req.url.startsWith('/done') ? 'ok' : page);
});
const wss = new WebSocketServer({
  server,
  handleProtocols: (protocols) => [...protocols].pop() || false,
});
wss.on('connection', (ws, req) => {
  console.log(JSON.stringify({ connection: req.url, origin: req.headers.origin || null,
                               authorization: req.headers.authorization || null,
                               cookie: req.headers.cookie || null }));
  ws.on('message', (data, isBinary) => {
    if (!isBinary && data.toString() === 'close') return ws.close(4001, 'asked to');
    ws.send(isBinary ? Buffer.concat([Buffer.from('echo:'), data]) : 'echo:' + data, { binary: isBinary });
  });
});
server.listen(port, '127.0.0.1', () => console.log(JSON.stringify({ listening: port })));
