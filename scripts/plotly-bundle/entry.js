'use strict';
// plotly.js core (which holds the scatter trace) and the two other trace types moeprof's report draws
var Plotly = require('plotly.js/lib/core');
Plotly.register([require('plotly.js/lib/bar'), require('plotly.js/lib/heatmap')]);
module.exports = Plotly;
