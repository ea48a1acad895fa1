// Command summarize prints the results table of a bench/run.sh run from its
// samples file: median and p90 per snapshotter and the ratio of each
// snapshotter to the first one named, the peer measured in the same run.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"seamless-bench/internal/benchstat"
)

func main() {
	samplesPath := flag.String("samples", "", "TSV samples file (bench, op, snapshotter, iteration, seconds)")
	snapshotterList := flag.String("snapshotters", "overlayfs,seamless", "comma-separated snapshotters; ratios are against the first")
	goal := flag.Float64("goal", 0, "if > 0, mark each ratio of medians as ok or OVER against this bound")
	flag.Parse()
	if *samplesPath == "" {
		fmt.Fprintln(os.Stderr, "summarize: -samples is required")
		os.Exit(2)
	}
	f, err := os.Open(*samplesPath)
	if err != nil {
		fmt.Fprintf(os.Stderr, "summarize: %v\n", err)
		os.Exit(1)
	}
	defer f.Close()
	samples, err := benchstat.ReadSamples(f)
	if err != nil {
		fmt.Fprintf(os.Stderr, "summarize: read %s: %v\n", *samplesPath, err)
		os.Exit(1)
	}
	if err := benchstat.PrintTable(os.Stdout, samples, strings.Split(*snapshotterList, ","), *goal); err != nil {
		fmt.Fprintf(os.Stderr, "summarize: %v\n", err)
		os.Exit(1)
	}
}
