// Browser test: serves examples/web on 127.0.0.1, opens it in headless Chromium (WebGPU
// through SwiftShader), runs a small forward and checks that the page reports a match
// with the CPU reference. Exit code 0 on a match, 1 otherwise. SCREENSHOT=file.png saves
// the page.
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../examples/web");
const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".css": "text/css" };

const server = http.createServer((request, response) => {
  const url = new URL(request.url, "http://127.0.0.1");
  const file = path.join(root, path.normalize(url.pathname).replace(/^\/+/, "") || "index.html");
  if (!file.startsWith(root) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
    response.writeHead(404).end("not found");
    return;
  }
  response.writeHead(200, { "content-type": types[path.extname(file)] ?? "application/octet-stream" });
  fs.createReadStream(file).pipe(response);
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const port = server.address().port;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: [
    "--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic",
  ],
});
let verdict = "ERROR no result";
try {
  const page = await browser.newPage();
  page.on("console", (message) => console.log(`[page] ${message.text()}`));
  page.on("pageerror", (error) => console.log(`[page error] ${error.message}`));
  const query = "auto=1&experts=6&tokens=48&topk=2&dmodel=16&dff=24";
  await page.goto(`http://127.0.0.1:${port}/index.html?${query}`);
  await page.waitForFunction(() => /^switch-moe: (MATCH|MISMATCH|ERROR)/.test(document.title), null, { timeout: 180_000 });
  verdict = await page.title();
  if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
  console.log(`page result: ${verdict}`);
  console.log(`page text: ${(await page.textContent("#stats")) ?? ""}`);
} finally {
  await browser.close();
  server.close();
}
process.exit(verdict.startsWith("switch-moe: MATCH") ? 0 : 1);
