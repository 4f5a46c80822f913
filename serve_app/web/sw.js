// Keeps the page's own files for when the server cannot be reached: a reload then shows the
// page with its banner, never the browser's error page. Network first: a server that answers
// always gives its own version of them. The API is never touched: it goes to the server.

const CACHE = "rbee-page";
// Every file of the page (tests/test_page.py checks the list against the folder).
const PAGE = [
  "/", "/ui/app.css", "/ui/favicon.svg", "/ui/app.js", "/ui/api.js", "/ui/board.js",
  "/ui/feed.js", "/ui/format.js", "/ui/forms.js", "/ui/hives.js", "/ui/panel.js",
  "/ui/progress.js", "/ui/sse.js",
];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(PAGE)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(self.clients.claim());
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin) return;
  if (url.pathname !== "/" && !url.pathname.startsWith("/ui/")) return;
  event.respondWith(networkFirst(event.request));
});

async function networkFirst(request) {
  const cache = await caches.open(CACHE);
  try {
    const response = await fetch(request);
    if (response.ok) await cache.put(request, response.clone());
    return response;
  } catch (err) {
    const kept = await cache.match(request, { ignoreSearch: true });
    if (kept) return kept;
    throw err;
  }
}
