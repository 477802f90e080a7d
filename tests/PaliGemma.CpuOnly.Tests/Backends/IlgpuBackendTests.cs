using System.Reflection;
using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Backends.EntryPoints;
using ILGPU.Backends.OpenCL;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using ILGPU.Runtime.OpenCL;
using PaliGemma.CpuOnly.Backends.ILGPU;
using PaliGemma.CpuOnly.Backends.ILGPU.Kernels;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Kernels.Backends;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Backends;

[Collection(nameof(IlgpuCollection))]
public sealed unsafe class IlgpuBackendTests(IlgpuFixture fixture)
{
    [Fact]
    public void Describes_itself_as_a_device_backend()
    {
        Assert.Equal("ilgpu-cpu", fixture.Backend.Name);
        Assert.Equal(IlgpuDevice.Cpu, fixture.Backend.Device);
        Assert.False(fixture.Backend.IsHost);
        using var buffer = fixture.Backend.Allocate(5);
        var zeros = new float[5];
        Array.Fill(zeros, 1f);
        fixture.Backend.Read(buffer.Span, zeros);
        Assert.Equal(new float[5], zeros);
        Assert.Throws<InvalidOperationException>(() => buffer.Span.HostSpan.Length);
    }

    [Fact]
    public void Rejects_buffers_and_weights_of_another_backend()
    {
        var device = fixture.Backend;
        var cpu = CpuBackend.Instance;
        using var scope = new DeviceScope(device);
        var mine = scope.Upload(new float[12]);
        var host = cpu.Allocate(12).Span;

        Assert.Contains("not to 'ilgpu-cpu'", Assert.Throws<ArgumentException>(() => device.Write(new float[12], host)).Message);
        Assert.Equal("a", Assert.Throws<ArgumentException>(() => device.Add(host, mine, mine)).ParamName);
        Assert.Equal("destination", Assert.Throws<ArgumentException>(() => device.Scale(mine, 2f, host)).ParamName);
        Assert.Equal("x", Assert.Throws<ArgumentException>(() => device.RmsNorm(host, mine, 2, 6, mine.Slice(0, 6), 1e-6f, false)).ParamName);
        Assert.Equal("x", Assert.Throws<ArgumentException>(() => device.Rope(host, 1, 1, 4, 4, [0], 10000f)).ParamName);
        Assert.Throws<ArgumentException>(() => cpu.Add(mine, host, host));

        float[] weights = new float[6];
        fixed (float* p = weights)
        {
            var cpuWeight = cpu.Upload(new WeightMatrix(p, DType.F32, 2, 3), []);
            Assert.Equal("weight", Assert.Throws<ArgumentException>(() => device.MatMul(mine, 2, cpuWeight, mine)).ParamName);
            using var deviceWeight = device.Upload(new WeightMatrix(p, DType.F32, 2, 3), []);
            Assert.Throws<ArgumentException>(() => cpu.MatMul(host, 2, deviceWeight, host));
        }
    }

    private sealed class OpaqueWeights : IMatrixOperand
    {
        public int Rows => 2;
        public int Cols => 2;
        public long StreamedBytes => 16;
        public IReadOnlyList<MemoryRegion> StreamedRegions => [];
        public void MultiplyOnHost(ReadOnlySpan<float> x, int rows, ReadOnlySpan<float> bias, Span<float> y, float outputSoftCap) { }
    }

    [Fact]
    public void Rejects_unknown_weight_types_and_bad_operands()
    {
        var device = fixture.Backend;
        var error = Assert.Throws<NotSupportedException>(() => device.Upload(new OpaqueWeights(), []));
        Assert.Contains(typeof(OpaqueWeights).FullName!, error.Message);

        using var scope = new DeviceScope(device);
        float[] values = new float[6];
        fixed (float* p = values)
        {
            var w = new WeightMatrix(p, DType.F32, 2, 3);   // N = 2, K = 3
            Assert.Equal("bias", Assert.Throws<ArgumentException>(() => device.Upload(w, new float[3])).ParamName);
            var resident = scope.Resident(w, []);
            var x = scope.Zeros(6);
            var y = scope.Zeros(4);
            Assert.Equal("x", Assert.Throws<ArgumentException>(() => device.MatMul(x.Slice(0, 5), 2, resident, y)).ParamName);
            Assert.Equal("y", Assert.Throws<ArgumentException>(() => device.MatMul(x, 2, resident, y.Slice(0, 3))).ParamName);
            Assert.Equal("rows", Assert.Throws<ArgumentOutOfRangeException>(() => device.MatMul(x, -1, resident, y)).ParamName);
            Assert.Equal("outputSoftCap", Assert.Throws<ArgumentOutOfRangeException>(() => device.MatMul(x, 2, resident, y, float.NaN)).ParamName);
            Assert.Equal("y", Assert.Throws<ArgumentException>(() => device.MatMul(x, 1, resident, x.Slice(2, 2))).ParamName);
        }
        var span = scope.Zeros(8);
        Assert.Equal("source", Assert.Throws<ArgumentException>(() => device.Write(new float[7], span)).ParamName);
        Assert.Equal("destination", Assert.Throws<ArgumentException>(() => device.Read(span, new float[9])).ParamName);
        Assert.Equal("b", Assert.Throws<ArgumentException>(() => device.Add(span.Slice(0, 4), span.Slice(0, 3), span.Slice(4, 4))).ParamName);
        Assert.Equal("destination", Assert.Throws<ArgumentException>(() => device.Add(span.Slice(0, 4), span.Slice(0, 4), span.Slice(1, 4))).ParamName);
        Assert.Equal("weight", Assert.Throws<ArgumentException>(() => device.RmsNorm(span, span, 2, 4, span.Slice(0, 3), 1e-6f, true)).ParamName);
        Assert.Equal("beta", Assert.Throws<ArgumentException>(() => device.LayerNorm(span, span, 2, 4, span.Slice(0, 4), span.Slice(0, 3), 1e-6f)).ParamName);
        Assert.Equal("headDim", Assert.Throws<ArgumentException>(() => device.Rope(span, 1, 1, 3, 4, [0], 10000f)).ParamName);
        Assert.Equal("positions", Assert.Throws<ArgumentException>(() => device.Rope(span, 2, 1, 4, 4, [0], 10000f)).ParamName);
    }

    [Fact]
    public void Attention_rejects_bad_problems()
    {
        var device = fixture.Backend;
        using var scope = new DeviceScope(device);
        var q = scope.Zeros(16);
        var kv = scope.Zeros(12);
        var output = scope.Zeros(16);
        DeviceAttentionProblem Valid() => new()
        {
            Q = q, QRowStride = 8, Queries = 2, K = kv, V = kv, KvRowStride = 4, Keys = 3,
            Heads = 2, KvHeads = 1, HeadDim = 4, Scale = 0.5f, KeyStart = new[] { 0, 0 }, KeyEnd = new[] { 3, 3 }, Output = output,
        };
        string? ParamName(Action action) => Assert.ThrowsAny<ArgumentException>(action).ParamName;

        device.Attention(Valid());   // the baseline is accepted
        Assert.Equal("problem.KvHeads", ParamName(() => { var p = Valid(); p.KvHeads = 3; device.Attention(p); }));
        Assert.Equal("problem.Q", ParamName(() => { var p = Valid(); p.Q = q.Slice(0, 15); device.Attention(p); }));
        Assert.Equal("problem.V", ParamName(() => { var p = Valid(); p.V = kv.Slice(0, 8); device.Attention(p); }));
        Assert.Equal("problem.KeyEnd", ParamName(() => { var p = Valid(); p.KeyEnd = new[] { 3, 4 }; device.Attention(p); }));
        Assert.Equal("problem.KeyValid", ParamName(() => { var p = Valid(); p.KeyValid = new byte[2]; device.Attention(p); }));
        Assert.Equal("problem.Output", ParamName(() => { var p = Valid(); p.Output = q; device.Attention(p); }));
        Assert.Equal("problem.K", ParamName(() => { var p = Valid(); p.K = CpuBackend.Instance.Allocate(12).Span; device.Attention(p); }));
        Assert.Throws<NotSupportedException>(() =>
        {
            var big = scope.Zeros(2 * 300);
            device.Attention(new DeviceAttentionProblem
            {
                Q = big, QRowStride = 300, Queries = 1, K = big, V = big, KvRowStride = 300, Keys = 1, Heads = 1, KvHeads = 1,
                HeadDim = 300, Scale = 1f, KeyStart = new[] { 0 }, KeyEnd = new[] { 1 }, Output = big.Slice(300, 300),
            });
        });
    }

    [Fact]
    public void Missing_devices_are_reported_by_kind()
    {
        var devices = IlgpuBackend.ListDevices();
        Assert.Contains(devices, d => d.Kind == IlgpuDevice.Cpu);
        if (!devices.Any(d => d.Kind == IlgpuDevice.Cuda))
            Assert.Contains("CUDA", Assert.Throws<InvalidOperationException>(() => IlgpuBackend.Create(IlgpuDevice.Cuda)).Message);
        if (!devices.Any(d => d.Kind == IlgpuDevice.OpenCL))
            Assert.Contains("OpenCL", Assert.Throws<InvalidOperationException>(() => IlgpuBackend.Create(IlgpuDevice.OpenCL)).Message);
        Assert.Equal("kind", Assert.Throws<ArgumentOutOfRangeException>(() => IlgpuBackend.Create((IlgpuDevice)42)).ParamName);
    }

    /// <summary>
    /// The device <see cref="IlgpuBackend.Create"/> opens for <see cref="IlgpuDevice.Cpu"/> (ILGPU's default simulator:
    /// 16-thread groups, so 4 x 4-thread GEMM tiles and 16-lane reductions), and the CPU backend through the same checks
    /// (the references and the test harness agree with the library's kernels).
    /// </summary>
    [Fact]
    public void The_default_simulator_and_the_cpu_backend_pass_the_same_checks()
    {
        using var simulator = IlgpuBackend.Create(IlgpuDevice.Cpu);
        Assert.Equal("ilgpu-cpu", simulator.Name);
        Assert.Equal(4, simulator.TileSide);
        foreach (var backend in new IComputeBackend[] { simulator, CpuBackend.Instance })
        {
            IlgpuMatMulTests.Check(backend, new DeviceMatMulCase(3, 77, 19, StoredWeights.BF16, Bias: true, SoftCap: 30f, XOffset: 1, Seed: 5));
            IlgpuMatMulTests.Check(backend, new DeviceMatMulCase(21, 77, 19, StoredWeights.Nf4, Bias: false, SoftCap: 0f, XOffset: 0, Seed: 6));
            IlgpuMatMulTests.Check(backend, new DeviceMatMulCase(40, 33, 35, StoredWeights.F16, Bias: true, SoftCap: 0f, XOffset: 2, Seed: 7));
            IlgpuAttentionTests.Check(backend, new DeviceAttentionCase(4, 50, 6, 2, 40, 1, 0, Kernels.MaskKind.PrefixCausal, true, 0f, 0.2f, 8));
        }
    }

    [Fact]
    public void A_disposed_backend_refuses_work()
    {
        var backend = IlgpuBackend.CreateCpuSimulator(threadsPerWarp: 2, warpsPerGroup: 1);
        var buffer = backend.Allocate(4);
        backend.Dispose();
        Assert.Throws<ObjectDisposedException>(() => backend.Allocate(4));
        Assert.Throws<ObjectDisposedException>(() => backend.Read(buffer.Span, new float[4]));
        buffer.Dispose();   // after the backend: nothing left to release, no error
        backend.Dispose();
    }

    /// <summary>
    /// No GPU runs here, so every kernel (each weight format's GEMV and GEMM included) is compiled to PTX and to OpenCL C,
    /// the code a CUDA or OpenCL device would load: an unsupported construct fails here rather than on the first GPU run.
    /// </summary>
    [Fact]
    public void Every_kernel_compiles_for_cuda_and_opencl()
    {
        var kernels = new List<MethodInfo>();
        foreach (var type in new[] { typeof(VectorKernels), typeof(AttentionKernel) })
            kernels.AddRange(type.GetMethods(BindingFlags.Public | BindingFlags.Static));
        foreach (var weights in new[] { typeof(Float32Weights), typeof(BFloat16Weights), typeof(Float16Weights), typeof(Q8Weights), typeof(Nf4Weights) })
        {
            kernels.Add(typeof(MatMulKernels).GetMethod(nameof(MatMulKernels.Gemv))!.MakeGenericMethod(weights));
            kernels.Add(typeof(MatMulKernels).GetMethod(nameof(MatMulKernels.Gemm))!.MakeGenericMethod(weights));
        }
        Assert.Equal(19, kernels.Count);

        using var context = Context.Create(builder => builder.EnableAlgorithms());
        using var ptx = new PTXBackend(context, CudaArchitecture.SM_70, CudaInstructionSet.ISA_70, nvvmAPI: null!);
        using var openCl = new CLBackend(context, new CLCapabilityContext(false, false, false, false, false), CLDeviceVendor.Other, CLCVersion.CL20);
        foreach (var kernel in kernels)
        {
            var entry = kernel.GetParameters()[0].ParameterType == typeof(Index1D)
                ? EntryPointDescription.FromImplicitlyGroupedKernel(kernel)
                : EntryPointDescription.FromExplicitlyGroupedKernel(kernel);
            var compiled = (PTXCompiledKernel)ptx.Compile(entry, default);
            Assert.Contains(".entry", compiled.PTXAssembly);
            CLCompiledKernel source;
            try { source = (CLCompiledKernel)openCl.Compile(entry, default); }
            catch (Exception e) { throw new Exception($"{kernel}: {e.InnerException?.InnerException?.Message ?? e.Message}", e); }
            Assert.Contains("kernel", source.Source);
        }
    }
}
