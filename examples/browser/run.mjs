// Serves the page from its own origin (so CORS is exercised), opens it in
// headless Chromium, and prints the page's result as one JSON line.
// Usage: node run.mjs BUCKET_URL USER N [TOKEN]
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const [bucket = "http://127.0.0.1:3000", user = "prana_demo", n = "5", token = ""] = process.argv.slice(2);
const root = dirname(fileURLToPath(import.meta.url));
const files = {
  "/": ["index.html", "text/html"],
  "/dist/app.js": ["dist/app.js", "text/javascript"],
};

const server = createServer(async (req, res) => {
  const entry = files[new URL(req.url, "http://x").pathname];
  if (!entry) {
    res.writeHead(404).end();
    return;
  }
  res.writeHead(200, { "content-type": entry[1] }).end(await readFile(join(root, entry[0])));
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const page = `http://127.0.0.1:${server.address().port}/?bucket=${encodeURIComponent(bucket)}&user=${encodeURIComponent(user)}&n=${n}&token=${encodeURIComponent(token)}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
  ],
});
let code = 0;
try {
  const tab = await browser.newPage();
  tab.on("console", (m) => console.error(`[page] ${m.text()}`));
  await tab.goto(page);
  await tab.waitForFunction(() => window.__result !== undefined, null, { timeout: 30_000 });
  const result = await tab.evaluate(() => window.__result);
  console.log(JSON.stringify(result));
  if (result.error) code = 1;
} catch (e) {
  console.error(e);
  code = 1;
} finally {
  await browser.close();
  server.close();
}
process.exit(code);
