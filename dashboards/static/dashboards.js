/* Draw every figure the page carries as JSON (charts.py) with plotly.js. */
(function () {
  "use strict";
  var config = { displaylogo: false, responsive: true };
  document.querySelectorAll("script.chart-data").forEach(function (block) {
    var target = document.getElementById(block.dataset.target);
    if (!target) { return; }
    var figure = JSON.parse(block.textContent);
    window.Plotly.newPlot(target, figure.data, figure.layout, config);
  });
})();
