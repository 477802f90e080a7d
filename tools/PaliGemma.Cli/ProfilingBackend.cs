using System.Diagnostics;
using PaliGemma.CpuOnly.Kernels.Backends;

namespace PaliGemma.Cli;

/// <summary>
/// A backend that runs every operation on another one and, while <see cref="Recording"/> is set, adds up the wall time
/// of each kind of operation (matrix products by weight shape): <c>bench --profile</c> uses it to show where a decode
/// step goes. Timing one call costs two timestamp reads and allocates nothing. The times are those of the calls
/// themselves, so on a backend that queues its work they mean little; the CPU backend runs each call to the end.
/// </summary>
internal sealed class ProfilingBackend(IComputeBackend inner) : IComputeBackend
{
    private readonly Dictionary<(int Rows, int Cols), OperationStats> _matrixStats = [];
    // Same-input groups (MatMulSameInput), by K and the N of each member (unused members 0), named "fused N0+N1+...xK".
    private readonly Dictionary<(int Cols, int N0, int N1, int N2, int N3), OperationStats> _fusedStats = [];
    // The inner backend's matrices of the group being run (reused: a timed call allocates nothing).
    private readonly ResidentMatrix[] _fusedInner = new ResidentMatrix[4];
    private readonly OperationStats[] _stats = Enum.GetValues<Operation>().Select(op => new OperationStats(Describe(op), 0)).ToArray();

    public enum Operation { Write, Read, Copy, Add, Scale, GeluTanh, GeluTanhMul, RmsNorm, LayerNorm, Rope, Attention }

    public bool Recording { get; set; }

    public string Name => inner.Name;
    public bool IsHost => inner.IsHost;

    /// <summary>Every kind of operation seen while recording, matrix products (single and fused) first.</summary>
    public IEnumerable<OperationStats> Stats =>
        MatrixStats.OrderByDescending(s => s.Ticks).Concat(_stats).Where(s => s.Calls > 0);

    private IEnumerable<OperationStats> MatrixStats => _matrixStats.Values.Concat(_fusedStats.Values);

    /// <summary>Calls and ticks of every kind of operation so far, by name (two snapshots bracket one phase).</summary>
    public Dictionary<string, (long Calls, long Ticks)> Snapshot() =>
        MatrixStats.Concat(_stats).ToDictionary(s => s.Name, s => (s.Calls, s.Ticks));

    /// <summary>Puts every running total back to <paramref name="snapshot"/>'s (what was recorded since is dropped).</summary>
    public void Restore(Dictionary<string, (long Calls, long Ticks)> snapshot)
    {
        foreach (var s in MatrixStats.Concat(_stats))
        {
            var (calls, ticks) = snapshot.GetValueOrDefault(s.Name);
            s.Set(calls, ticks);
        }
    }

    public void Reset()
    {
        foreach (var s in MatrixStats.Concat(_stats)) s.Reset();
    }

    public DeviceBuffer Allocate(long length) => inner.Allocate(length);

    public void Write(ReadOnlySpan<float> source, DeviceSpan destination)
    {
        long start = Stopwatch.GetTimestamp();
        inner.Write(source, destination);
        Record(_stats[(int)Operation.Write], start);
    }

    public void Read(DeviceSpan source, Span<float> destination)
    {
        long start = Stopwatch.GetTimestamp();
        inner.Read(source, destination);
        Record(_stats[(int)Operation.Read], start);
    }

    public ResidentMatrix Upload(IMatrixOperand weight, ReadOnlySpan<float> bias)
    {
        var key = (weight.Rows, weight.Cols);
        if (!_matrixStats.TryGetValue(key, out var stats))
            _matrixStats[key] = stats = new OperationStats($"matmul {weight.Rows}x{weight.Cols}", weight.StreamedBytes);
        return new ProfiledMatrix(this, weight, inner.Upload(weight, bias), bias.Length, stats);
    }

    public void MatMul(DeviceSpan x, int rows, ResidentMatrix weight, DeviceSpan y, float outputSoftCap = 0f)
    {
        var profiled = weight as ProfiledMatrix ?? throw new ArgumentException($"the weight was made resident on '{weight.Backend.Name}', not on the profiler", nameof(weight));
        long start = Stopwatch.GetTimestamp();
        inner.MatMul(x, rows, profiled.Inner, y, outputSoftCap);
        Record(profiled.Stats, start);
    }

    /// <summary>
    /// Times the whole group as one operation, "fused N0+N1+...xK" (its bytes: all members' weights), so the profile
    /// shows what the fused call costs rather than its members' shares.
    /// </summary>
    public void MatMulSameInput(DeviceSpan x, int rows, ReadOnlySpan<ResidentMatrix> weights, ReadOnlySpan<DeviceSpan> outputs)
    {
        SameInputProducts.Check(rows, weights, outputs);
        if (weights.Length is 0 || weights.Length > _fusedInner.Length)
        {
            for (int i = 0; i < weights.Length; i++)
                MatMul(x, rows, weights[i], outputs[i]);
            return;
        }
        for (int i = 0; i < weights.Length; i++)
            _fusedInner[i] = (weights[i] as ProfiledMatrix ?? throw new ArgumentException($"weight {i} was made resident on '{weights[i].Backend.Name}', not on the profiler", nameof(weights))).Inner;
        var stats = FusedStats(weights);
        long start = Stopwatch.GetTimestamp();
        inner.MatMulSameInput(x, rows, _fusedInner.AsSpan(0, weights.Length), outputs);
        Record(stats, start);
    }

    private OperationStats FusedStats(ReadOnlySpan<ResidentMatrix> weights)
    {
        int n = weights.Length;
        var key = (weights[0].Cols, weights[0].Rows, n > 1 ? weights[1].Rows : 0, n > 2 ? weights[2].Rows : 0, n > 3 ? weights[3].Rows : 0);
        if (!_fusedStats.TryGetValue(key, out var stats))
        {
            long bytes = 0;
            var rows = new string[weights.Length];
            for (int i = 0; i < weights.Length; i++)
            {
                bytes += weights[i].Source.StreamedBytes;
                rows[i] = weights[i].Rows.ToString(System.Globalization.CultureInfo.InvariantCulture);
            }
            _fusedStats[key] = stats = new OperationStats($"fused {string.Join('+', rows)}x{weights[0].Cols}", bytes);
        }
        return stats;
    }

    public void Copy(DeviceSpan source, DeviceSpan destination)
    {
        long start = Stopwatch.GetTimestamp();
        inner.Copy(source, destination);
        Record(_stats[(int)Operation.Copy], start);
    }

    public void Add(DeviceSpan a, DeviceSpan b, DeviceSpan destination)
    {
        long start = Stopwatch.GetTimestamp();
        inner.Add(a, b, destination);
        Record(_stats[(int)Operation.Add], start);
    }

    public void Scale(DeviceSpan x, float factor, DeviceSpan destination)
    {
        long start = Stopwatch.GetTimestamp();
        inner.Scale(x, factor, destination);
        Record(_stats[(int)Operation.Scale], start);
    }

    public void GeluTanh(DeviceSpan x, DeviceSpan y)
    {
        long start = Stopwatch.GetTimestamp();
        inner.GeluTanh(x, y);
        Record(_stats[(int)Operation.GeluTanh], start);
    }

    public void GeluTanhMul(DeviceSpan gate, DeviceSpan up, DeviceSpan y)
    {
        long start = Stopwatch.GetTimestamp();
        inner.GeluTanhMul(gate, up, y);
        Record(_stats[(int)Operation.GeluTanhMul], start);
    }

    public void RmsNorm(DeviceSpan x, DeviceSpan y, int rows, int dim, DeviceSpan weight, float eps, bool unitOffset)
    {
        long start = Stopwatch.GetTimestamp();
        inner.RmsNorm(x, y, rows, dim, weight, eps, unitOffset);
        Record(_stats[(int)Operation.RmsNorm], start);
    }

    public void LayerNorm(DeviceSpan x, DeviceSpan y, int rows, int dim, DeviceSpan gamma, DeviceSpan beta, float eps)
    {
        long start = Stopwatch.GetTimestamp();
        inner.LayerNorm(x, y, rows, dim, gamma, beta, eps);
        Record(_stats[(int)Operation.LayerNorm], start);
    }

    public void Rope(DeviceSpan x, int rows, int heads, int headDim, int rowStride, ReadOnlySpan<int> positions, float theta)
    {
        long start = Stopwatch.GetTimestamp();
        inner.Rope(x, rows, heads, headDim, rowStride, positions, theta);
        Record(_stats[(int)Operation.Rope], start);
    }

    public void Attention(scoped in DeviceAttentionProblem problem)
    {
        long start = Stopwatch.GetTimestamp();
        inner.Attention(problem);
        Record(_stats[(int)Operation.Attention], start);
    }

    private void Record(OperationStats stats, long start)
    {
        if (Recording) stats.Add(Stopwatch.GetTimestamp() - start);
    }

    private static string Describe(Operation operation) => operation switch
    {
        Operation.Write => "write (host to backend)",
        Operation.Read => "read (backend to host)",
        Operation.GeluTanh => "gelu",
        Operation.GeluTanhMul => "gelu x up",
        Operation.RmsNorm => "rms norm",
        Operation.LayerNorm => "layer norm",
        _ => operation.ToString().ToLowerInvariant(),
    };

    /// <summary>Calls and time of one kind of operation; <see cref="BytesPerCall"/> is the weight a matrix product streams.</summary>
    internal sealed class OperationStats(string name, long bytesPerCall)
    {
        public string Name { get; } = name;
        public long BytesPerCall { get; } = bytesPerCall;
        public long Calls { get; private set; }
        public long Ticks { get; private set; }
        public double Seconds => Ticks / (double)Stopwatch.Frequency;

        public void Add(long ticks)
        {
            Calls++;
            Ticks += ticks;
        }

        public void Reset() => Calls = Ticks = 0;

        public void Set(long calls, long ticks) => (Calls, Ticks) = (calls, ticks);
    }

    private sealed class ProfiledMatrix(IComputeBackend backend, IMatrixOperand source, ResidentMatrix inner, int biasLength, OperationStats stats)
        : ResidentMatrix(backend, source, biasLength)
    {
        public ResidentMatrix Inner { get; } = inner;
        public OperationStats Stats { get; } = stats;

        public override void Dispose()
        {
            Inner.Dispose();
            base.Dispose();
        }
    }
}
