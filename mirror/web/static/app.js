// mirror's web page: the little that needs a script. The page works without it.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // Click a pull line to copy it.
  for (const el of document.querySelectorAll("[data-copy]")) {
    el.title = "click to copy";
    el.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(el.textContent.trim());
      } catch (e) {
        const range = document.createRange();
        range.selectNodeContents(el);
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        return;
      }
      el.classList.add("copied");
      setTimeout(() => el.classList.remove("copied"), 1500);
    });
  }
  // The overview, left open on a screen, reloads itself while it is visible.
  const refresh = document.querySelector("[data-refresh]");
  if (refresh) {
    const seconds = Number(refresh.dataset.refresh) || 30;
    setInterval(() => {
      if (document.visibilityState === "visible") location.reload();
    }, seconds * 1000);
  }
});
