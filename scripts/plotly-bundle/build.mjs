// Builds plotly-moeprof.min.js with plotly.js's own bundling settings (its esbuild-config.js: an IIFE defining the
// global Plotly, target es2016, global -> window, NODE_DEBUG false), minified. Two differences: only the trace
// types the report draws, and no CSS (the only CSS plotly.js imports is maplibre-gl's, used by map traces alone).
import * as esbuild from 'esbuild';
import { environmentPlugin } from 'esbuild-plugin-environment';
import { readFileSync } from 'node:fs';

const version = JSON.parse(readFileSync('node_modules/plotly.js/package.json', 'utf8')).version;
await esbuild.build({
  entryPoints: ['entry.js'],
  outfile: 'plotly-moeprof.min.js',
  format: 'iife',
  globalName: 'Plotly',
  bundle: true,
  minify: true,
  sourcemap: false,
  legalComments: 'eof',
  plugins: [environmentPlugin({ NODE_DEBUG: false })],
  loader: { '.css': 'empty' },
  define: { global: 'window', 'define.amd': 'false' },
  target: 'es2016',
  banner: { js: `/**\n* plotly.js (moeprof report bundle: scatter, bar, heatmap - minified) v${version}\n` +
                 '* Copyright 2012-2026, Plotly, Inc.\n* All rights reserved.\n* Licensed under the MIT license\n*/' },
  logLevel: 'info',
});
