namespace PaliGemma.Bench.Onnx;

/// <summary>An ONNX node attribute: a float, an int or a list of ints.</summary>
internal readonly record struct OnnxAttribute(string Name, float? Float = null, long? Int = null, long[]? Ints = null)
{
    public static OnnxAttribute Of(string name, float value) => new(name, Float: value);
    public static OnnxAttribute Of(string name, long value) => new(name, Int: value);
    public static OnnxAttribute Of(string name, params long[] values) => new(name, Ints: values);
}

/// <summary>
/// Builds a single-graph ONNX model (fp32 tensors only) and writes it with <see cref="ProtoWriter"/>. Field numbers are
/// those of onnx/onnx.proto. Initializers larger than <see cref="ExternalThreshold"/> bytes go to a side file as ONNX
/// external data, so multi-gigabyte weights (the LM head) never pass through one protobuf buffer.
/// </summary>
internal sealed unsafe class OnnxModelBuilder
{
    private const long ExternalThreshold = 256L << 20;
    private const int ElemFloat = 1;           // TensorProto.DataType.FLOAT
    private const int AttrFloat = 1, AttrInt = 2, AttrInts = 7;

    private readonly List<(string Op, string[] Inputs, string[] Outputs, OnnxAttribute[] Attributes, string Domain)> _nodes = [];
    private readonly List<(string Name, long[] Dims, nint Data, long Count)> _initializers = [];
    private readonly List<(string Name, long[] Dims)> _inputs = [];
    private readonly List<(string Name, long[] Dims)> _outputs = [];

    public int Opset { get; init; } = 17;

    public void Input(string name, params long[] dims) => _inputs.Add((name, dims));

    public void Output(string name, params long[] dims) => _outputs.Add((name, dims));

    /// <summary>An fp32 constant; the memory is read when <see cref="Save"/> runs and must stay valid until then.</summary>
    public void Initializer(string name, float* data, long count, params long[] dims)
    {
        long product = 1;
        foreach (long d in dims)
            product *= d;
        if (product != count)
            throw new ArgumentException($"initializer '{name}': dims [{string.Join(", ", dims)}] hold {product} values, the data {count}", nameof(dims));
        _initializers.Add((name, dims, (nint)data, count));
    }

    public void Node(string op, string[] inputs, string[] outputs, params OnnxAttribute[] attributes) =>
        _nodes.Add((op, inputs, outputs, attributes, ""));

    /// <summary>Writes <c>model.onnx</c> (and any external data files) into <paramref name="directory"/>; returns the model path.</summary>
    public string Save(string directory)
    {
        Directory.CreateDirectory(directory);
        var model = new ProtoWriter();
        model.Int64(1, 8);                                 // ir_version 8 (opset 17 era)
        model.String(2, "PaliGemma.Bench");                // producer_name
        model.Message(8, o => { o.String(1, ""); o.Int64(2, Opset); });   // opset_import, default domain
        model.Message(7, g => WriteGraph(g, directory));   // graph
        string path = Path.Combine(directory, "model.onnx");
        using (var file = File.Create(path))
            model.WriteTo(file);
        return path;
    }

    private void WriteGraph(ProtoWriter graph, string directory)
    {
        int n = 0;
        foreach (var node in _nodes)
        {
            graph.Message(1, w =>
            {
                foreach (string input in node.Inputs) w.String(1, input);
                foreach (string output in node.Outputs) w.String(2, output);
                w.String(3, $"{node.Op}_{n++}");
                w.String(4, node.Op);
                foreach (var attribute in node.Attributes) w.Message(5, a => WriteAttribute(a, attribute));
                if (node.Domain.Length > 0) w.String(7, node.Domain);
            });
        }
        graph.String(2, "bench");
        foreach (var init in _initializers)
            graph.Message(5, t => WriteTensor(t, init, directory));
        foreach (var (name, dims) in _inputs)
            graph.Message(11, v => WriteValueInfo(v, name, dims));
        foreach (var (name, dims) in _outputs)
            graph.Message(12, v => WriteValueInfo(v, name, dims));
    }

    private static void WriteAttribute(ProtoWriter w, OnnxAttribute attribute)
    {
        w.String(1, attribute.Name);
        if (attribute.Float is float f)
        {
            w.Float(2, f);
            w.Int64(20, AttrFloat);
        }
        else if (attribute.Int is long i)
        {
            w.Int64(3, i);
            w.Int64(20, AttrInt);
        }
        else if (attribute.Ints is long[] ints)
        {
            foreach (long v in ints) w.Int64(8, v);
            w.Int64(20, AttrInts);
        }
        else
            throw new ArgumentException($"attribute '{attribute.Name}' has no value", nameof(attribute));
    }

    private static void WriteTensor(ProtoWriter t, (string Name, long[] Dims, nint Data, long Count) init, string directory)
    {
        foreach (long d in init.Dims) t.Int64(1, d);
        t.Int64(2, ElemFloat);
        t.String(8, init.Name);
        long bytes = init.Count * sizeof(float);
        if (bytes <= ExternalThreshold)
        {
            t.Bytes(9, new ReadOnlySpan<byte>((void*)init.Data, checked((int)bytes)));   // raw_data, little-endian
            return;
        }
        string fileName = init.Name + ".bin";
        using (var file = File.Create(Path.Combine(directory, fileName)))
        {
            const int Chunk = 64 << 20;
            for (long offset = 0; offset < bytes; offset += Chunk)
                file.Write(new ReadOnlySpan<byte>((byte*)init.Data + offset, (int)Math.Min(Chunk, bytes - offset)));
        }
        t.Message(13, e => { e.String(1, "location"); e.String(2, fileName); });   // external_data
        t.Message(13, e => { e.String(1, "offset"); e.String(2, "0"); });
        t.Message(13, e => { e.String(1, "length"); e.String(2, bytes.ToString(System.Globalization.CultureInfo.InvariantCulture)); });
        t.Int64(14, 1);                                                            // data_location = EXTERNAL
    }

    private static void WriteValueInfo(ProtoWriter v, string name, long[] dims)
    {
        v.String(1, name);
        v.Message(2, type => type.Message(1, tensor =>                 // TypeProto.tensor_type
        {
            tensor.Int64(1, ElemFloat);                                // elem_type
            tensor.Message(2, shape =>                                 // TensorShapeProto
            {
                foreach (long d in dims)
                    shape.Message(1, dim => dim.Int64(1, d));          // Dimension.dim_value
            });
        }));
    }
}
