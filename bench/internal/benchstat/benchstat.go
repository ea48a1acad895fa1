// Package benchstat owns the sample format shared by every benchmark in
// bench/ and the one definition of median, p90 and ratio used to report them.
// It must not run benchmarks or talk to containerd.
//
// A sample is one timed operation: bench, op, snapshotter, iteration, seconds,
// written as one tab-separated line so shell-timed and Go-timed samples can
// be summarised together.
package benchstat

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Sample is one timed operation.
type Sample struct {
	Bench       string
	Op          string
	Snapshotter string
	Iteration   int
	Duration    time.Duration
}

// WriteSamples appends samples to path as TSV lines.
func WriteSamples(path string, samples []Sample) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open samples file %s: %w", path, err)
	}
	w := bufio.NewWriter(f)
	for _, s := range samples {
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%.9f\n", s.Bench, s.Op, s.Snapshotter, s.Iteration, s.Duration.Seconds())
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return fmt.Errorf("write samples file %s: %w", path, err)
	}
	return f.Close()
}

// ReadSamples parses TSV lines written by WriteSamples or by bench/run.sh.
func ReadSamples(r io.Reader) ([]Sample, error) {
	var out []Sample
	sc := bufio.NewScanner(r)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		f := strings.Split(text, "\t")
		if len(f) != 5 {
			return nil, fmt.Errorf("samples line %d: want 5 tab-separated fields, got %d", line, len(f))
		}
		it, err := strconv.Atoi(f[3])
		if err != nil {
			return nil, fmt.Errorf("samples line %d: iteration %q: %w", line, f[3], err)
		}
		secs, err := strconv.ParseFloat(f[4], 64)
		if err != nil {
			return nil, fmt.Errorf("samples line %d: seconds %q: %w", line, f[4], err)
		}
		out = append(out, Sample{f[0], f[1], f[2], it, time.Duration(secs * float64(time.Second))})
	}
	return out, sc.Err()
}

// Percentile returns the nearest-rank percentile p (0 < p <= 100) of ds:
// the smallest sample with at least p% of the samples at or below it.
// Nearest rank never interpolates, so every reported number was measured.
func Percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	sorted := append([]time.Duration(nil), ds...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	if rank < 1 {
		rank = 1
	}
	return sorted[rank-1]
}

type key struct{ bench, op string }

// PrintTable writes one row per (bench, op): median and p90 for each
// snapshotter in order, then the ratio of every later snapshotter to the
// first one (the peer measured in the same run). With goal > 0 each ratio of
// medians is also judged against it. Rows keep first-seen order.
func PrintTable(w io.Writer, samples []Sample, snapshotters []string, goal float64) error {
	var order []key
	byKey := map[key]map[string][]time.Duration{}
	for _, s := range samples {
		k := key{s.Bench, s.Op}
		if _, ok := byKey[k]; !ok {
			byKey[k] = map[string][]time.Duration{}
			order = append(order, k)
		}
		byKey[k][s.Snapshotter] = append(byKey[k][s.Snapshotter], s.Duration)
	}

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	header := []string{"bench", "op", "n"}
	for _, sn := range snapshotters {
		header = append(header, sn+" p50", sn+" p90")
	}
	for _, sn := range snapshotters[1:] {
		// With one candidate the caption above the table names the pair.
		label := "ratio"
		if len(snapshotters) > 2 {
			label = sn + "/" + snapshotters[0]
		}
		header = append(header, label+" p50", label+" p90")
		if goal > 0 {
			header = append(header, fmt.Sprintf("p50<=%.2fx", goal))
		}
	}
	fmt.Fprintln(tw, strings.Join(header, "\t")+"\t")
	for _, k := range order {
		row := []string{k.bench, k.op}
		n := len(byKey[k][snapshotters[0]])
		row = append(row, strconv.Itoa(n))
		p50 := map[string]time.Duration{}
		p90 := map[string]time.Duration{}
		for _, sn := range snapshotters {
			ds := byKey[k][sn]
			if len(ds) == 0 {
				row = append(row, "-", "-")
				continue
			}
			p50[sn], p90[sn] = Percentile(ds, 50), Percentile(ds, 90)
			row = append(row, FormatDuration(p50[sn]), FormatDuration(p90[sn]))
		}
		base := snapshotters[0]
		for _, sn := range snapshotters[1:] {
			row = append(row, ratio(p50[sn], p50[base]), ratio(p90[sn], p90[base]))
			if goal > 0 {
				row = append(row, verdict(p50[sn], p50[base], goal))
			}
		}
		fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
	}
	return tw.Flush()
}

func ratio(candidate, peer time.Duration) string {
	if candidate == 0 || peer == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", float64(candidate)/float64(peer))
}

func verdict(candidate, peer time.Duration, goal float64) string {
	if candidate == 0 || peer == 0 {
		return "-"
	}
	if float64(candidate) <= goal*float64(peer) {
		return "ok"
	}
	return "OVER"
}

// FormatDuration prints a duration with three significant digits in the
// unit people read fastest for it.
func FormatDuration(d time.Duration) string {
	switch {
	case d >= time.Second:
		return fmt.Sprintf("%.3gs", d.Seconds())
	case d >= time.Millisecond:
		return fmt.Sprintf("%.3gms", float64(d)/float64(time.Millisecond))
	default:
		return fmt.Sprintf("%.3gµs", float64(d)/float64(time.Microsecond))
	}
}
