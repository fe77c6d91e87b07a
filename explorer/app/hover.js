<script>
// Show the image under the pointer on the t-SNE map: thumbnails ride in each point's customdata[0].
(function () {
  function box() {
    let el = document.getElementById("tsne-hover");
    if (!el) { el = document.createElement("div"); el.id = "tsne-hover"; el.innerHTML = "<img alt=''>";
      document.body.appendChild(el); }
    return el;
  }
  function attach() {
    document.querySelectorAll("#tsne_plot .js-plotly-plot").forEach(function (plot) {
      if (plot.dataset.hoverAttached) return;
      plot.dataset.hoverAttached = "1";
      plot.on("plotly_hover", function (ev) {
        const p = ev.points && ev.points[0];
        const src = p && p.customdata && p.customdata[0];
        if (!src || String(src).indexOf("data:image/") !== 0) return;
        const el = box(); el.firstChild.src = src; el.style.display = "block";
        el.style.left = (ev.event.clientX + 16) + "px"; el.style.top = (ev.event.clientY + 16) + "px";
      });
      plot.on("plotly_unhover", function () { box().style.display = "none"; });
    });
  }
  new MutationObserver(attach).observe(document.documentElement, { childList: true, subtree: true });
})();
</script>
